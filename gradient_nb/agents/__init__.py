"""Agents on the mesh: a signed capability ledger, MCP tools reachable across the mesh, beacon selection,
weighted voting and a planner (Symphony, Gradientsys). Imports only from the layers below it."""
