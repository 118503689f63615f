"""Built-in pass families, one module each.  Importing a module registers its passes."""
