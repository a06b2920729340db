package sideeffects

import (
	"errors"

	"github.com/twmb/franz-go/pkg/kerr"
)

// isMembershipError reports whether a commit failed because this member no
// longer belongs to the group's current generation: its partitions are
// (being) given to others, so retrying the commit is pointless.
func isMembershipError(err error) bool {
	return errors.Is(err, kerr.IllegalGeneration) ||
		errors.Is(err, kerr.UnknownMemberID) ||
		errors.Is(err, kerr.RebalanceInProgress) ||
		errors.Is(err, kerr.FencedInstanceID)
}
