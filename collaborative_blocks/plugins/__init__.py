"""Built-in plugins. Each module is registered like a third-party plugin and is a template to
copy: it imports only the public package and says in its docstring how it is configured."""
