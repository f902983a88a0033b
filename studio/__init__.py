"""CRAFT Studio: the Gradio app (layout and event wiring only; the work is done by ``craft``).

Start it with ``craft studio``; build it in Python with :func:`studio.app.build_app`.
"""
