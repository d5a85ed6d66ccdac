"""For the notebooks: plots, explorers, Markdown tables, and running notebooks with papermill."""
