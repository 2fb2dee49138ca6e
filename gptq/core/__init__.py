"""Numbers only: the Hessian, the GPTQ solver, the grids. No I/O, no hooks, no model knowledge."""
