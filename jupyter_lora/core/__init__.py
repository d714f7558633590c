"""The engine: targets, plans, memory estimates and adapter operations. Imports torch, transformers and PEFT;
never IPython, ipywidgets or plotly."""
