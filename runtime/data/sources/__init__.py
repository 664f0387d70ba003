"""Users' own data: readers for the formats the field uses, the data config, and the registry that picks one."""
