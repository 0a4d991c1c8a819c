"""ppfr's YAML configs (`<group>/<option>.yaml`), installed as package data beside the code.

A package so that `importlib.resources.files("configs")` finds them in a wheel as in a checkout.
"""
