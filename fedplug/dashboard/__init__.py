"""The live web dashboard, served by the federation server on its own port.

``FederationServer`` calls :func:`attach` when ``dashboard.enabled`` is true
(the default); open ``http://<server host>:<port>/`` in a browser.  The page is
pushed every protocol event as it happens (server-sent events), so it shows
each client's state, the round counter and the learning curves live.  See
``docs/dashboard.md``.

Modules: :mod:`.live` (client states from event rows), :mod:`.stream`
(fan-out with a bounded queue per page), :mod:`.snapshot` (the whole picture
as JSON), :mod:`.routes` (the HTTP handlers and :func:`attach`); the page
itself is in ``static/``.
"""

from fedplug.dashboard.routes import attach

__all__ = ["attach"]
