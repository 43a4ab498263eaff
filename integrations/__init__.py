"""Model families attached from outside moeca's own model code (DESIGN section 1b); each is an optional extra."""
