// placeholder: the browser client lands with issue 5
