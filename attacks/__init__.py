"""Attacks on protected faces (U-Net reconstruction, re-identification): next milestone."""
