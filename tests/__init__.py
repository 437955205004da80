"""The test suite, by part:

- ``engine/`` — the middleware, the producer and readers, options, the protocol, key
  extractors, bad input, a real server;
- ``stores/`` — everything that runs against every store (conformance, faults, security; its
  ``conftest.py`` parametrizes them over store and event loop), and the Redis internals;
- ``integrations/`` — ``@durable`` on FastAPI/Starlette/Django, the AI SDK recipe, other
  servers, several processes, the CLI, the examples in a browser;
- ``clients/`` — the Python client (its sans-IO core and against a server) and the browser one;
- ``support/`` — what the tests share: apps, the in-process and real-server harnesses, the
  cutting proxy, the browser launcher, store factories, the Django project, the pages.
"""
