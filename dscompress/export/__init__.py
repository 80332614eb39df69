"""Exporters and checkpoint formats."""
