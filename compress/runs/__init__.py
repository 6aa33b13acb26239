"""Layer above methods and evals: the runner, results store, grids, reports, console."""
