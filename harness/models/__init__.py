"""Models: what names a model, read without open_clip (``names``), and building it with open_clip (``build``);
clipkd's own model configs are in ``configs/``."""
