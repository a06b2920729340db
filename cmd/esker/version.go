package main

import (
	"fmt"
	"runtime"
	"runtime/debug"
	"strings"
)

func runVersion(e *env, args []string) int {
	fs := newFlagSet("version", "esker version", `
Prints the module version of this build, the Go version and, when built from
a git checkout, the commit.`)
	fs.examples = `
esker version`
	if code, ok := fs.parse(e, args); !ok {
		return code
	}
	fmt.Fprintln(e.stdout, versionString())
	return 0
}

// versionString is "esker v1.2.3 (go1.26.8 linux/amd64, commit 0123abc)";
// a build from a source tree reports the version "(devel)".
func versionString() string {
	version, extra := "(unknown)", []string{runtime.Version() + " " + runtime.GOOS + "/" + runtime.GOARCH}
	if bi, ok := debug.ReadBuildInfo(); ok {
		if bi.Main.Version != "" {
			version = bi.Main.Version
		}
		var rev string
		var dirty bool
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				rev = s.Value
			case "vcs.modified":
				dirty = s.Value == "true"
			}
		}
		if rev != "" {
			if len(rev) > 12 {
				rev = rev[:12]
			}
			if dirty {
				rev += "-dirty"
			}
			extra = append(extra, "commit "+rev)
		}
	}
	return fmt.Sprintf("esker %s (%s)", version, strings.Join(extra, ", "))
}
