#!/bin/sh
# As the official image's entrypoint: `redis-server` (or only its options) runs as user
# redis; the official build also turns protected mode off by default, which Debian's
# redis-server (no config file) leaves on, refusing every client but loopback.
set -e
if [ "${1#-}" != "$1" ] || [ "${1%.conf}" != "$1" ]; then
    set -- redis-server "$@"
fi
if [ "$1" = redis-server ]; then
    case " $* " in
        *.conf\ *|*--protected-mode*) ;;
        *) set -- "$@" --protected-mode no ;;
    esac
    if [ "$(id -u)" = 0 ]; then
        find . \! -user redis -exec chown redis '{}' +
        exec setpriv --reuid=redis --regid=redis --init-groups "$@"
    fi
fi
exec "$@"
