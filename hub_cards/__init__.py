"""The model-card templates of OISA checkpoints (Markdown with YAML front matter, rendered with Jinja), installed as
the `oisa_hub_cards` package so that `oisa push` and `eval.py --card` find them outside a source checkout too."""
