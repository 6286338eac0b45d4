"""What the host adds to gradio's page (modules/ui_gradio_extensions.py).

`reload_javascript()` replaces gradio's `TemplateResponse` so that every page served gets, before
`</head>`: an empty `window.localization`, the host's root `script.js` (here the double's
tests/host/script.js), every `javascript/*.js` of the host root and of each extension (each folder
sorted by name), then their `*.mjs` as modules and a no-referrer meta tag; and before `</body>`: each
`style.css` of the host root and of the extensions, `user.css` of the data folder, and the theme's
page background. Files are linked as `file=<path>?<mtime>`, the path relative to the working
directory when it lies under it, as the host writes them; gradio serves them only from its working
directory or `allowed_paths`.

The original `TemplateResponse` stays in `GradioTemplateResponseOriginal` (and in
`shared.GradioTemplateResponseOriginal`, where the host keeps it); `undo()` puts it back.
"""

from __future__ import annotations

import json
import os

import gradio as gr

from modules import paths, scripts, shared

cwd = os.getcwd()
GradioTemplateResponseOriginal = gr.routes.templates.TemplateResponse
_own_attribute = "TemplateResponse" in vars(gr.routes.templates)
if not hasattr(shared, "GradioTemplateResponseOriginal"):
    shared.GradioTemplateResponseOriginal = GradioTemplateResponseOriginal


def _relative_to_cwd(path: str) -> str:
    target = os.path.abspath(path)
    try:
        if os.path.commonpath([target, cwd]) == cwd:
            return os.path.relpath(target, cwd)
    except ValueError:
        pass
    return target


def webpath(fn: str) -> str:
    return f"file={_relative_to_cwd(fn)}?{os.path.getmtime(fn)}"


def javascript_html() -> str:
    head = f'<script type="text/javascript">window.localization = {json.dumps({})}</script>\n'
    head += f'<script type="text/javascript" src="{webpath(os.path.join(paths.script_path, "script.js"))}"></script>\n'
    for script in scripts.list_scripts("javascript", ".js"):
        head += f'<script type="text/javascript" src="{webpath(script.path)}"></script>\n'
    for script in scripts.list_scripts("javascript", ".mjs"):
        head += f'<script type="module" src="{webpath(script.path)}"></script>\n'
    return head


def resolve_var(name: str, theme=None, seen: tuple = ()) -> str:
    """A theme variable with `*other` references followed down to a value that names no variable;
    a circular reference gives white (black for a `_dark` variable)."""
    theme = theme or shared.gradio_theme
    key = name.strip()
    key = key[1:] if key.startswith("*") else key
    if key in seen:
        return "#000000" if seen[0].endswith("_dark") else "#ffffff"
    value = getattr(theme, key, None)
    return resolve_var(value, theme, (*seen, key)) if value else key


def css_html() -> str:
    def stylesheet(fn: str) -> str:
        return f'<link rel="stylesheet" property="stylesheet" href="{webpath(fn)}">'

    head = "".join(stylesheet(fn) for fn in scripts.list_files_with_name("style.css"))
    user_css = os.path.join(paths.data_path, "user.css")
    if os.path.exists(user_css):
        head += stylesheet(user_css)
    light = resolve_var("background_fill_primary")
    dark = resolve_var("background_fill_primary_dark")
    head += (f"<style>html {{ background-color: {light}; }} "
             f"@media (prefers-color-scheme: dark) {{ html {{ background-color: {dark}; }} }}</style>")
    return head


def reload_javascript() -> None:
    js = javascript_html()
    css = css_html()

    def template_response(*args, **kwargs):
        res = GradioTemplateResponseOriginal(*args, **kwargs)
        res.body = res.body.replace(b"</head>", f'{js}<meta name="referrer" content="no-referrer"/></head>'.encode())
        res.body = res.body.replace(b"</body>", f"{css}</body>".encode())
        res.init_headers()
        return res

    gr.routes.templates.TemplateResponse = template_response


def undo() -> None:
    if _own_attribute:
        gr.routes.templates.TemplateResponse = GradioTemplateResponseOriginal
    else:  # gradio's own: the method of the templates' class
        vars(gr.routes.templates).pop("TemplateResponse", None)
