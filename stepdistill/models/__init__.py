"""Models: the frozen teacher, the generators (one class per student kind), EMA and the router."""
