"""The math of VoG (DESIGN.md §1–2), free of Ray: moment states and their one merge kernel,
the window grammar, the audit options, the gradient engine (torch), and the score-table rows,
class normalisation and ranks that the single-process and the distributed audit share.

Modules that do not need torch (``moments``, ``windows``, ``options``, ``labels``, ``table``,
``ranking``) never import it, so Ray's reduce workers stay torch-free.
"""
