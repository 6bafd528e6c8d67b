"""Scoring policies: offline over held-out RLDS episodes, and in closed loop in any simulator.

`offline` (action-prediction metrics per dataset), `closed_loop` (the episode loop every simulator
shares), `summary` (Wilson intervals, per-task summaries, the report files).
"""
