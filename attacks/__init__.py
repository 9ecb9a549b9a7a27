"""Privacy audits of what a server observes (gradient inversion, membership).

Not implemented yet: this package is reserved for the attack registry and audit
reports (see README, "Status and limits").
"""
