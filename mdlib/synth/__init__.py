"""mini-NSD: procedural scenes, a simulated brain, and a writer that uses NSD's exact file formats."""
