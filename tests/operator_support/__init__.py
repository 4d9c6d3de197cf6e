"""Test support for the operator: an API-server-like emulator, fixtures, a stand-in router."""
