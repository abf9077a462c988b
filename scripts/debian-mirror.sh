# Sourced by the scripts that need Debian's mirror (install-criu.sh,
# test-fresh-debian.sh): mirror_uri prints the mirror this machine's apt
# already uses for its binary packages (the security mirror aside), from
# deb822 sources or the one-line format.
mirror_uri() {
    if [ -f /etc/apt/sources.list.d/debian.sources ]; then
        awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' \
            /etc/apt/sources.list.d/debian.sources
    fi
    if [ -f /etc/apt/sources.list ]; then
        awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /:\/\//) { print $i; exit } }' \
            /etc/apt/sources.list
    fi
}
