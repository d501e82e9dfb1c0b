"""The grounded shapes world (WORLD.md): the scene generator and its records' loader."""
