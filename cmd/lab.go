package cmd

import "github.com/spf13/cobra"

// TODO(owner of lab): replace this placeholder.
func newLabCmd() *cobra.Command {
	return &cobra.Command{Use: "lab", Short: "lab (not yet implemented)", Hidden: true}
}
