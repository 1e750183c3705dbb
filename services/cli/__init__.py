"""The ``lorafleet`` command."""
