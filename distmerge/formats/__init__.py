"""LoRA normalization: every supported layout and base naming turned into one ``Delta`` type.

``normalize`` matches a LoRA's keys to the base, ``keymap`` renames keys between namings
(Wan/diffusers/ComfyUI/kohya), ``naming`` detects a base's naming, ``scales`` reads α/rank and
adapter configs, ``shapes`` holds each delta kind's shape rule, ``kinds`` names the delta kinds
and factor roles.
"""
