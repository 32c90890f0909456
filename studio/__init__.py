"""Gradio layer of MMIE Studio: one module per tab, handlers are plain functions."""
