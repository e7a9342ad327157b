"""The core every other layer stands on: settings, tables, the database, the queue, queries, constitutions."""
