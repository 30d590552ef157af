"""The study around the library: ``finercut compare`` (prune with several methods, evaluate every variant, write
the Markdown report), the results table as one model rendered to Markdown and HTML, and ``finercut report`` (one
self-contained HTML page of a run or a compare folder). Nothing in the library core imports this package."""
