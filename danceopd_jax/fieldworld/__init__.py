"""The field world: a benchmark with exact answers (issue 27).

Gaussian-mixture targets for every capability in a low-dimensional point space (``targets``),
their exact velocity fields and densities (``exact_fields``), exact scores with standard errors
(``scores``), record sources in the pipeline's shape (``data``), a small MLP student (``mlp``) and
scatter-plot grids (``plots``).
"""
