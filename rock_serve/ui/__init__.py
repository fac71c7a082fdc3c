"""The web console's static files (served by the Admin at ``/ui``; no CDN, no build step).

``index.html``, ``app.js`` (vanilla JS) and ``app.css`` are ours. ``vendor/`` holds files copied
unchanged from npm packages (source maps removed): ``xterm.js`` and ``xterm.css`` from
``@xterm/xterm`` 6.0.0 and ``addon-fit.js`` from ``@xterm/addon-fit`` 0.11.0, both MIT
(``vendor/LICENSE.xterm``, ``vendor/LICENSE.addon-fit``). To update: ``npm pack
@xterm/xterm @xterm/addon-fit`` and copy ``lib/xterm.js``, ``css/xterm.css`` and
``lib/addon-fit.js``.
"""
