"""Operator actions, one module per resource, shared by every door an operator uses.

The JSON admin API (relay.admin), the operator pages (relay.console.admin) and the CLI
(relay.cli*) all call these functions, so validation, the change and its audit row
follow one code path. Dependencies run one way: those three sit above this package;
nothing here imports them.

    base.py       Op (who acts, on what, with which fields) and Env (config, db, gateway)
    parse.py      exact values from JSON bodies and query strings; storage errors mapped
    views.py      the JSON shape of each record
    users.py      users, balances and top-ups
    keys.py       API keys          groups.py     groups (multiplier, models)
    channels.py   upstream channels prices.py     model prices and their versions
    codes.py      redemption codes  plans.py      plans, plan codes, subscriptions
    invites.py    sign-up and invite codes
    audit.py      the audit log     usage.py      spend, request log, bills, health
"""
