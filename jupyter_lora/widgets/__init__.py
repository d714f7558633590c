"""Notebook widgets: the live training progress (``progress``) and, later, the adapter panel.

Widgets render core results and events; they import ipywidgets and plotly lazily, never torch at import time.
"""
