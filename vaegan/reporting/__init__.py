"""What evaluation and the probe share to show results: report.html, image grids, Markdown tables."""
