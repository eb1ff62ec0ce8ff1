"""`vaegan eval`: the reconstruction benchmark, its results and its Markdown/CSV/JSON report and figures."""
