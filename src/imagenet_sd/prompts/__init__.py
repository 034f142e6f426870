"""Class sets, WordNet, and the paper's prompts: templates, Places365 backgrounds, class-matched backgrounds."""
