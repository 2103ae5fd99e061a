"""From config to objects: the typed schemas, composition and value checks (schema), and building
each group's node into its object with its keys checked against the target (build)."""
