package main

import "strings"

// helpText is the help of one action of a command.
type helpText struct{ synopsis, about, examples string }

// indent indents every line of s by two spaces.
func indent(s string) string {
	return "  " + strings.ReplaceAll(s, "\n", "\n  ")
}

// useAction makes the usage and the usage errors of f those of its action
// (see flagSet.actions): "esker inspect group: ..." and "Run 'esker inspect
// group --help'". It does nothing for a name that is not an action.
func (f *flagSet) useAction(action string) {
	h, ok := f.actions[action]
	if !ok {
		return
	}
	f.name += " " + action
	f.synopsis, f.about, f.examples = h.synopsis, strings.TrimSpace(h.about), h.examples
	f.actions = nil
}
