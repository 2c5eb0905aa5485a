"""The HTML report of runs and `prospect eval` files (`prospect report`); see page.py."""
