"""Training on the workers: the one recipe (``recipe.train``) on one process or a Ray
Train worker group, its engines, loop, model building, export and the warm runners."""
