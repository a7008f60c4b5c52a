"""The stages of one txt2img/img2img render; `runtime.render.Renderer` calls them in order.

See `runtime.render` for the order and the extension points.
"""
