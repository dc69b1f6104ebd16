"""The plugin manager: built-ins, entry points and explicitly named plugins.

There is no global plugin manager: each :class:`~collaborative_blocks.core.runtime.Runtime`
(or each ``open_store`` call without one) builds its own with :func:`make_plugin_manager`.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from types import ModuleType

import pluggy

from collaborative_blocks.core import hookspecs
from collaborative_blocks.core.extensions import StoreFactory
from collaborative_blocks.errors import PluginError, UnknownSchemeError

__all__ = [
    "BUILTIN_PLUGINS",
    "ENTRY_POINT_GROUP",
    "hookimpl",
    "make_plugin_manager",
    "store_factories",
    "url_scheme",
]

hookimpl = pluggy.HookimplMarker(hookspecs.PROJECT_NAME)

ENTRY_POINT_GROUP = "collaborative_blocks"

#: Registered first, in this order, by every plugin manager (unless ``builtins=False``).
BUILTIN_PLUGINS: tuple[str, ...] = (
    "collaborative_blocks.plugins.stores",
    "collaborative_blocks.plugins.transports.memory",
    "collaborative_blocks.plugins.transports.log",
    "collaborative_blocks.plugins.transports.redis",
    "collaborative_blocks.plugins.transports.nats",
    "collaborative_blocks.plugins.resolvers",
)


def make_plugin_manager(
    plugins: Iterable[str | ModuleType | object] = (),
    *,
    builtins: bool = True,
    entry_points: bool = True,
) -> pluggy.PluginManager:
    """A plugin manager with the hookspecs, the built-ins, the entry points and ``plugins``.

    A string in ``plugins`` is a module name (what ``-p`` takes); a module or object is
    registered as it is. A module that cannot be imported is a :class:`PluginError`.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    if builtins:
        for name in BUILTIN_PLUGINS:
            _register(pm, name)
    if entry_points:
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        except Exception as error:  # a broken third-party plugin must say which it is
            raise PluginError(
                f"loading plugins from entry-point group {ENTRY_POINT_GROUP!r} failed: {error}"
            ) from error
    for plugin in plugins:
        _register(pm, plugin)
    pm.check_pending()
    return pm


def _register(pm: pluggy.PluginManager, plugin: str | ModuleType | object) -> None:
    if isinstance(plugin, str):
        if pm.get_plugin(plugin) is not None:
            return
        try:
            module = importlib.import_module(plugin)
        except ImportError as error:
            raise PluginError(
                f"plugin module {plugin!r} could not be imported ({error}); check the name "
                "given to -p / plugins= and that it is installed"
            ) from error
        pm.register(module, name=plugin)
    elif pm.is_registered(plugin):
        return
    else:
        pm.register(plugin)


def url_scheme(url: str) -> str:
    """The scheme of a URL (``sqlite+aiosqlite`` for ``sqlite+aiosqlite:///x.db``)."""
    return url.split("://", 1)[0].lower() if "://" in url else ""


def store_factories(pm: pluggy.PluginManager) -> dict[str, StoreFactory]:
    """Scheme -> store factory, from every plugin; a scheme claimed twice is an error."""
    found: dict[str, StoreFactory] = {}
    owners: dict[str, str] = {}
    # Called per implementation (not through pm.hook) so an error can name the plugin.
    for impl in pm.hook.cb_store_factories.get_hookimpls():
        factories = impl.function()
        for factory in _as_list(factories, "cb_store_factories", impl.plugin_name):
            if not isinstance(factory, StoreFactory):
                raise PluginError(
                    f"plugin {impl.plugin_name!r}: cb_store_factories returned {factory!r}, which "
                    "has no `schemes` and `async open(url, *, clock)`"
                )
            for scheme in factory.schemes:
                scheme = scheme.lower()
                if scheme in found:
                    raise PluginError(
                        f"URL scheme {scheme!r} is provided by both {owners[scheme]!r} and "
                        f"{impl.plugin_name!r}; unregister one of them"
                    )
                found[scheme] = factory
                owners[scheme] = impl.plugin_name
    return found


def resolve_store_factory(pm: pluggy.PluginManager, url: str, setting: str | None) -> StoreFactory:
    factories = store_factories(pm)
    factory = factories.get(url_scheme(url))
    if factory is None:
        raise UnknownSchemeError("event store", url, list(factories), setting)
    return factory


def _as_list(value: object, hook: str, plugin: str) -> Sequence[object]:
    if isinstance(value, list | tuple):
        return value
    raise PluginError(f"plugin {plugin!r}: {hook} must return a list, got {type(value).__name__}")
