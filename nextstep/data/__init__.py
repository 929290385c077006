"""Training data: sample sources, training sequences, and the procedural shapes world (``shapes``)."""
