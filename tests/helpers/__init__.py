"""Helpers shared by danlu's tests (imported as `helpers.<module>`; pytest puts tests/ on sys.path)."""
