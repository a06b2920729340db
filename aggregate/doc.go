// Package aggregate defines event-sourced aggregates: a decide function that
// turns a command into events (or a rejection) and an evolve function that
// folds an event into state.
//
// User code is typed with Go generics: an aggregate is a Type[S, C, E] where
// S is the state, C the command interface and E the event interface. Commands
// and events are registered by name so that a JSON body such as
//
//	{"type": "Deposit", "data": {"amount": 500}}
//
// decodes to the registered Go type without casts in user code.
//
// The package is pure: it knows nothing of Kafka, Pebble or HTTP. The engine
// drives it through the untyped Definition interface, and the envelope and
// header helpers in envelope.go describe how commands and events travel in
// Kafka records so that consumers in other languages can read them.
package aggregate
