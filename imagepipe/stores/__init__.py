"""State store adapters: implementations of imagepipe.pool.store.Store.

sqlite: the embedded default (one host, settings key state_db). postgres: a shared
PostgreSQL database (settings key state: postgresql://...), for several keepers and admin
machines. Only imagepipe.app.bootstrap chooses and builds one.
"""
