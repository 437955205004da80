"""A tiny Django project for the `@durable` tests: settings, URLs and views, no database."""
