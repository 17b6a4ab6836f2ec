# Read by each interactive login shell of the tiny desktop ($ENV).
logout() { exit 0; }
