"""Offline evaluation of policies over held-out RLDS episodes."""
